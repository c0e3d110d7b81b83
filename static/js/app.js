// papertag's only script (served from our origin; the CSP forbids inline scripts).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Live character count for fields that declare data-counter="<id of the output element>".
  for (const field of document.querySelectorAll("[data-counter]")) {
    const output = document.getElementById(field.dataset.counter);
    if (!output) continue;
    const update = () => {
      const min = Number(field.getAttribute("minlength") || 0);
      const max = Number(field.getAttribute("maxlength") || 0);
      const n = field.value.trim().length;
      output.textContent = `${n} characters` + (n && n < min ? ` (at least ${min})` : "") + (max && n > max ? ` (at most ${max})` : "");
    };
    field.addEventListener("input", update);
    update();
  }
  // Prevent double submission while the model answers.
  const form = document.getElementById("predict-form");
  if (form) {
    form.addEventListener("submit", () => {
      const button = form.querySelector("button[type=submit]");
      if (button) {
        button.disabled = true;
        button.textContent = "Tagging…";
      }
    });
  }
});
