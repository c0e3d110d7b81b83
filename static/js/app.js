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
  // The phone menu: at narrow widths the navigation and account fold behind one button (app.css).
  const topbar = document.querySelector(".topbar");
  const toggle = topbar && topbar.querySelector(".menu-toggle");
  if (toggle) {
    topbar.classList.add("foldable");
    toggle.hidden = false;
    toggle.addEventListener("click", () => {
      const open = topbar.classList.toggle("open");
      toggle.setAttribute("aria-expanded", String(open));
    });
  }
  // Narrow screens stack table rows; each cell shows its column's heading (app.css, .table-wrap td::before).
  for (const table of document.querySelectorAll(".table-wrap table")) {
    const headings = [...table.querySelectorAll("thead th")].map((th) => th.textContent.trim());
    for (const row of table.querySelectorAll("tbody tr")) {
      [...row.cells].forEach((cell, i) => {
        if (headings[i] && !cell.dataset.label) cell.dataset.label = headings[i];
      });
    }
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
