// API key pages: a "copy" button next to a newly created key (without JavaScript the key can
// still be selected and copied by hand).
(function () {
  var field = document.getElementById("new-key");
  var button = document.getElementById("copy-key");
  if (!field || !button) return;
  button.hidden = false;
  field.addEventListener("focus", function () { field.select(); });
  function copied() { button.textContent = button.getAttribute("data-done"); }
  function fallback() {
    field.select();
    try { if (document.execCommand("copy")) copied(); } catch (e) { /* select by hand */ }
  }
  button.addEventListener("click", function () {
    field.select();
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(field.value).then(copied, fallback);
    } else {
      fallback();
    }
  });
})();
