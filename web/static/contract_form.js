// New-contract form: show two party rows and an "add party" button. Without JavaScript all
// rendered rows are shown and empty ones are ignored by the server.
(function () {
  var list = document.getElementById("party-rows");
  var add = document.getElementById("add-party");
  if (!list || !add) return;
  var max = parseInt(list.getAttribute("data-max"), 10) || 20;

  function rows() { return list.querySelectorAll("fieldset.party"); }
  function isEmpty(row) {
    var inputs = row.querySelectorAll("input");
    for (var i = 0; i < inputs.length; i++) if (inputs[i].value.trim()) return false;
    return true;
  }
  function visibleCount() {
    var n = 0, all = rows();
    for (var i = 0; i < all.length; i++) if (!all[i].hidden) n++;
    return n;
  }
  function update() { add.disabled = visibleCount() >= max; }
  function focusRow(row) { var first = row.querySelector("input"); if (first) first.focus(); }

  var all = rows();
  for (var i = 2; i < all.length; i++) if (isEmpty(all[i])) all[i].hidden = true;
  add.hidden = false;
  update();

  add.addEventListener("click", function () {
    var hidden = list.querySelector("fieldset.party[hidden]");
    if (hidden) { hidden.hidden = false; focusRow(hidden); update(); return; }
    var current = rows();
    if (current.length >= max) return;
    var index = current.length;
    var row = current[current.length - 1].cloneNode(true);
    row.id = "party-" + index;
    var named = row.querySelectorAll("[name]");
    for (var j = 0; j < named.length; j++) {
      named[j].name = named[j].name.replace(/^party-\d+-/, "party-" + index + "-");
      if (named[j].tagName === "INPUT") named[j].value = "";
    }
    var number = row.querySelector(".n");
    if (number) number.textContent = String(index + 1);
    list.appendChild(row);
    focusRow(row);
    update();
  });
})();
