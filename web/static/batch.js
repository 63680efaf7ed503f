// The batch page: asks /batches/<id>/progress every 1.5 seconds while the batch runs and
// updates the numbers, the bar, the status, the actions and the rows shown, in place. Without
// JavaScript the page reloads itself instead (a <noscript> refresh).
(function () {
  "use strict";
  var root = document.getElementById("batch");
  if (!root || !window.fetch) return;
  var url = root.dataset.progressUrl;
  var table = document.getElementById("documents");
  var english = document.documentElement.lang === "en";
  var INTERVAL = 1500;
  var failures = 0;

  function byId(id) { return document.getElementById(id); }
  function setText(id, value) { var el = byId(id); if (el) el.textContent = String(value); }

  function stateLabel(state) {
    return (table && table.dataset["label" + state.charAt(0).toUpperCase() + state.slice(1)]) || state;
  }

  function updateRow(doc) {
    if (!table) return;
    var row = table.querySelector('tr[data-position="' + doc.position + '"]');
    if (!row || (row.dataset.state === doc.state && doc.state !== "waiting")) return;
    row.dataset.state = doc.state;
    var state = row.querySelector("td.state");
    var detail = row.querySelector("td.detail");
    var action = row.querySelector("td.action");
    var badge = document.createElement("span");
    badge.className = "status doc-" + doc.state;
    badge.textContent = stateLabel(doc.state);
    state.replaceChildren(badge);
    detail.replaceChildren();
    action.replaceChildren();
    if (doc.state === "done" && doc.document_id) {
      var link = document.createElement("a");
      link.className = "docid";
      link.href = (table.dataset.verifyBase || "/verify") + "/" + encodeURIComponent(doc.document_id);
      link.textContent = doc.document_id;
      detail.appendChild(link);
      if (doc.download) {
        var download = document.createElement("a");
        download.href = doc.download;
        download.setAttribute("download", "");
        download.textContent = table.dataset.download;
        action.appendChild(download);
      }
    } else if (doc.error) {
      var reason = document.createElement("span");
      reason.className = "reason" + (doc.state === "failed" ? " failed" : "");
      var text = english ? (doc.error_en || doc.error) : doc.error;
      reason.textContent = doc.state === "failed" ? text : table.dataset.retrying + ": " + text;
      detail.appendChild(reason);
    }
  }

  function update(body) {
    var p = body.progress;
    var processed = p.done + p.failed;
    setText("processed", processed);
    setText("total", p.total);
    setText("count-done", p.done);
    setText("count-failed", p.failed);
    var failedCount = byId("count-failed");
    if (failedCount) failedCount.classList.toggle("zero", p.failed === 0);
    setText("count-waiting", p.waiting + p.running);
    setText("filter-all", p.total);
    ["done", "failed", "waiting", "running"].forEach(function (s) { setText("filter-" + s, p[s]); });
    setText("retry-count", p.failed);
    var bar = byId("progress-bar");
    if (bar) { bar.max = Math.max(1, p.total); bar.value = processed; bar.textContent = processed + " / " + p.total; }
    var status = byId("batch-status");
    if (status && status.dataset.status !== body.status) {
      status.dataset.status = body.status;
      status.className = "status batch-" + body.status;
      status.textContent = root.dataset["status" + body.status.charAt(0).toUpperCase() + body.status.slice(1)] || body.status;
    }
    var running = (body.status === "running" || body.status === "draft") && !p.complete;
    var retry = byId("retry");
    if (retry) retry.hidden = !(p.failed > 0 && (body.status === "running" || body.status === "finished"));
    var cancel = byId("cancel");
    if (cancel) cancel.hidden = !(body.status === "running" || body.status === "draft");
    var note = byId("live-note");
    if (note) note.hidden = !running;
    var complete = byId("complete-note");
    if (complete) complete.hidden = body.status !== "finished";
    var completeFailed = byId("complete-failed");
    if (completeFailed) completeFailed.hidden = p.failed === 0;
    var downloadRow = byId("download-row");
    if (downloadRow) downloadRow.hidden = p.done === 0;
    var download = byId("download-zip");
    if (download) download.classList.toggle("secondary", running);
    var actions = byId("actions");
    if (actions) actions.hidden = p.done === 0 && retry && retry.hidden && cancel && cancel.hidden;
    (body.documents || []).forEach(updateRow);
    root.dataset.running = running ? "true" : "false";
    // Keep asking until the batch is over (its status follows the last document shortly).
    return running || body.status === "running" || body.status === "draft";
  }

  function poll() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        return response.json().then(function (body) { return { ok: response.ok, body: body }; });
      })
      .then(function (result) {
        var offline = byId("offline");
        if (!result.ok) {
          if (offline) {
            offline.textContent = (result.body.error && (english ? result.body.error.message_en : result.body.error.message)) || root.dataset.offline;
            offline.hidden = false;
          }
          if (result.body.error && result.body.error.code === "login_required") return;
          window.setTimeout(poll, INTERVAL * 4);
          return;
        }
        failures = 0;
        if (offline) offline.hidden = true;
        if (update(result.body)) window.setTimeout(poll, INTERVAL);
      })
      .catch(function () {
        failures += 1;
        var offline = byId("offline");
        if (offline) { offline.textContent = root.dataset.offline; offline.hidden = false; }
        window.setTimeout(poll, Math.min(30000, INTERVAL * Math.pow(2, failures)));
      });
  }

  if (root.dataset.running === "true") window.setTimeout(poll, INTERVAL);
})();
