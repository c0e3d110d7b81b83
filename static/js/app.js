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
  // A table wider than its box scrolls sideways: the box then takes the keyboard focus (arrow keys scroll it) and
  // is named after its section's heading, so keyboard users reach every column too.
  const wraps = [...document.querySelectorAll(".table-wrap")];
  const reachable = () => {
    for (const wrap of wraps) {
      if (wrap.scrollWidth > wrap.clientWidth + 1) {
        const heading = wrap.closest("section, main").querySelector("h1, h2, h3");
        wrap.tabIndex = 0;
        wrap.setAttribute("role", "region");
        wrap.setAttribute("aria-label", `${heading ? heading.textContent.trim() : "Table"} (scrolls sideways)`);
      } else {
        wrap.removeAttribute("tabindex");
        wrap.removeAttribute("role");
        wrap.removeAttribute("aria-label");
      }
    }
  };
  reachable();
  window.addEventListener("resize", reachable);
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
