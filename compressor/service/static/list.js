"use strict";
// The jobs list redraws itself while a job is queued or running (not while the user is choosing jobs).
(function () {
  const table = document.getElementById("jobs");
  if (!table || !table.dataset.active) return;
  setInterval(function () {
    if (!document.querySelector('#jobs input[type="checkbox"]:checked')) location.reload();
  }, 4000);
})();
