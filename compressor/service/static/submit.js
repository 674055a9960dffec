"use strict";
// The submit form: upload the model and the data, then queue the job, all through the JSON API, so an
// error shown here is the API's own one line.
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const csrfHeader = document.querySelector('meta[name="csrf-header"]').content;
  const form = document.getElementById("submit-form");
  const errorBox = document.getElementById("submit-error");
  const statusBox = document.getElementById("submit-status");
  const uploaded = new Map();  // a file sent once is not sent again when only the options change

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (csrf) h[csrfHeader] = csrf;
    return h;
  }
  async function failure(response) {
    let text = "HTTP " + response.status;
    try {
      const body = await response.json();
      if (body.error) text = body.error;
    } catch (e) { /* not JSON: keep the status */ }
    return new Error(text);
  }
  async function upload(file) {
    const key = [file.name, file.size, file.lastModified].join("/");
    if (uploaded.has(key)) return uploaded.get(key);
    const body = new FormData();
    body.append("file", file, file.name);
    const r = await fetch("/v1/files", {method: "POST", body: body, headers: headers(), credentials: "same-origin"});
    if (!r.ok) throw await failure(r);
    const id = (await r.json()).id;
    uploaded.set(key, id);
    return id;
  }
  function number(text) {  // a value that is no number goes as typed, for the API to name
    const v = Number(text);
    return text.trim() !== "" && Number.isFinite(v) ? v : text;
  }
  function options() {
    const v = (id) => document.getElementById(id).value.trim();
    const o = {arch: v("arch"), target_flops: number(v("target_flops")), criterion: v("criterion"),
               schedule: v("schedule"), epochs: number(v("epochs"))};
    for (const key of ["mean", "std"]) {
      if (v(key)) o[key] = v(key).split(",").map(number);
    }
    if (v("extra")) {
      let extra;
      try { extra = JSON.parse(v("extra")); } catch (e) { extra = null; }
      if (!extra || typeof extra !== "object" || Array.isArray(extra)) {
        throw new Error("more options: must be a JSON object, e.g. {\"latency_runs\": 10}");
      }
      Object.assign(o, extra);
    }
    return o;
  }
  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    errorBox.hidden = true;
    const start = document.getElementById("start");
    start.disabled = true;
    try {
      const opts = options();
      statusBox.hidden = false;
      statusBox.textContent = "uploading the model…";
      const model = await upload(document.getElementById("model").files[0]);
      statusBox.textContent = "uploading the data…";
      const data = await upload(document.getElementById("data").files[0]);
      statusBox.textContent = "queueing the job…";
      const r = await fetch("/v1/jobs", {method: "POST", credentials: "same-origin",
        headers: headers({"Content-Type": "application/json"}),
        body: JSON.stringify({model: model, data: data, options: opts})});
      if (!r.ok) throw await failure(r);
      location.href = "/ui/jobs/" + (await r.json()).id;
    } catch (e) {
      statusBox.hidden = true;
      errorBox.textContent = e.message;
      errorBox.hidden = false;
      start.disabled = false;
    }
  });
})();
