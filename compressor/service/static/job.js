"use strict";
// The job page follows the job's event stream (the API's server-sent events, with the login cookie) and
// reads it as compressor/service/views.py does: stages share the bar equally, the current task fills its
// stage's share. When the stream ends, the page reloads to show the result.
(function () {
  const section = document.getElementById("job");
  const id = section.dataset.job;
  const TERMINAL = ["succeeded", "failed", "canceled"];
  const STAGES = ["load", "trace", "prune", "fine-tune", "export", "validate"];
  const ALIASES = {stage_started: "stage", task_started: "task", task_progress: "advance", task_finished: "done"};
  // The state is a fold over the events in order, so a stream that starts again from the beginning (a
  // reconnect; the older events' advances, whose "n" is the units advanced rather than the event's number,
  // make the server re-read the file) rebuilds it. Only the log must not repeat a line: it goes by number.
  let logged = Number(section.dataset.last || 0);  // log lines up to this event are on the page already
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const csrfHeader = document.querySelector('meta[name="csrf-header"]').content;
  const s = {stage: null, finished: 0, task: null, done: 0, total: null, eta: null, started: null};

  function fmt(seconds) {
    const t = Math.round(seconds);
    return t >= 60 ? Math.floor(t / 60) + ":" + String(t % 60).padStart(2, "0") : t + " s";
  }
  function apply(ev) {
    const kind = ALIASES[ev.type || ev.kind] || ev.type || ev.kind;
    const t = ev.time !== undefined ? ev.time : ev.t;
    if (kind === "stage") {
      Object.assign(s, {stage: ev.name, task: null, done: 0, total: null, eta: null});
      if (STAGES.includes(ev.name)) s.finished = STAGES.indexOf(ev.name);
    } else if (kind === "task") {
      Object.assign(s, {task: ev.description, done: 0, total: ev.total || null, eta: null, started: t});
    } else if (kind === "advance") {
      s.done = Number.isInteger(ev.done) ? ev.done : s.done + 1;
      s.total = ev.total || s.total;
      if ("eta_seconds" in ev) s.eta = ev.eta_seconds;
      else if (s.total && s.started !== null && s.done) s.eta = Math.max(0, (t - s.started) / s.done * (s.total - s.done));
    } else if (kind === "done") {
      Object.assign(s, {task: null, eta: null});
    } else if (["note", "warning", "error"].includes(kind) && ev.message && ev.n > logged) {
      logged = ev.n;
      const li = document.createElement("li");
      li.className = kind;
      li.textContent = kind + ": " + ev.message;
      document.getElementById("log").appendChild(li);
    } else if (kind === "finished") {
      Object.assign(s, {finished: STAGES.length, task: null, eta: null});
    }
    draw();
  }
  function draw() {
    const within = s.task && s.total ? Math.min(s.done / s.total, 1) : 0;
    const fraction = s.finished >= STAGES.length ? 1 : s.stage ? (s.finished + within) / STAGES.length : 0;
    document.getElementById("bar").value = fraction;
    document.getElementById("stage").textContent = s.stage || "–";
    document.getElementById("task").textContent = s.task ? s.task + " " + s.done + "/" + (s.total || "?") : "";
    document.getElementById("eta").textContent = s.eta !== null && s.eta !== undefined ? "ETA " + fmt(s.eta) : "";
  }
  async function act(method, path, then) {
    const h = {};
    if (csrf) h[csrfHeader] = csrf;
    const r = await fetch("/v1/jobs/" + id + path, {method: method, headers: h, credentials: "same-origin"});
    if (r.ok) return then();
    const box = document.getElementById("action-error");
    let text = "HTTP " + r.status;
    try { text = (await r.json()).error || text; } catch (e) { /* keep the status */ }
    box.textContent = text;
    box.hidden = false;
  }
  const cancel = document.getElementById("cancel");
  if (cancel) cancel.addEventListener("click", () => act("POST", "/cancel", () => location.reload()));
  const del = document.getElementById("delete");
  if (del) del.addEventListener("click", () => {
    if (confirm("Delete this job and its files?")) act("DELETE", "", () => { location.href = "/ui/"; });
  });

  if (TERMINAL.includes(section.dataset.status)) return;
  const stream = new EventSource("/v1/jobs/" + id + "/events?after=0");
  stream.onmessage = (m) => apply(JSON.parse(m.data));
  stream.addEventListener("end", () => {
    stream.close();
    location.reload();
  });
})();
