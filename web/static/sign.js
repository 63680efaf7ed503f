// The sign page: drag and drop of several PDFs or ZIPs onto the upload box, the chosen files
// listed, and the button disabled while the upload runs. The form works without JavaScript.
(function () {
  "use strict";
  var form = document.getElementById("sign-form");
  var drop = document.getElementById("drop");
  var input = document.getElementById("file");
  var chosen = document.getElementById("chosen");
  var button = document.getElementById("sign-button");
  if (!form || !drop || !input || !chosen || !button) return;

  function show() {
    while (chosen.firstChild) chosen.removeChild(chosen.firstChild);
    var files = input.files || [];
    var shown = Math.min(files.length, 50);
    for (var i = 0; i < shown; i++) {
      var item = document.createElement("li");
      item.textContent = files[i].name + " (" + Math.max(1, Math.round(files[i].size / 1024)) + " KB)";
      chosen.appendChild(item);
    }
    if (files.length > shown) {
      var more = document.createElement("li");
      more.className = "more";
      more.textContent = "… +" + (files.length - shown);
      chosen.appendChild(more);
    }
    chosen.hidden = files.length === 0;
  }

  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (event) { event.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function (event) { event.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (event) {
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      show();
    }
  });
  input.addEventListener("change", show);
  form.addEventListener("submit", function () {
    // Disabled after this event, so that the browser still sends the form once.
    window.setTimeout(function () {
      button.disabled = true;
      if (button.dataset.busy) button.textContent = button.dataset.busy;
    }, 0);
  });
  show();
})();
