// Pages of a party: the consent button waits for the check box; forms are sent once.
"use strict";
document.querySelectorAll("form.consent").forEach((form) => {
  const box = form.querySelector("input[name=agree]");
  const button = form.querySelector("button[type=submit]");
  const sync = () => { button.disabled = !box.checked; };
  box.addEventListener("change", sync);
  sync();
});
document.querySelectorAll("form").forEach((form) => {
  form.addEventListener("submit", () => {
    // after this event, so that the form is still sent
    setTimeout(() => form.querySelectorAll("button[type=submit]").forEach((b) => { b.disabled = true; }), 0);
  });
});
