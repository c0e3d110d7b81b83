// Keyboard-first review (issue 12 point 3) on /curate/predictions/<id>: accept, save, skip and undo press the
// page's own submit buttons (so the server sees exactly what a click sends, and the page works without this
// script); digits toggle the current taxonomy's labels, "/" jumps to its label search, "[" and "]" move between
// taxonomies and "?" shows this map. Keys never fire while a text field has focus (Escape leaves it).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("review-form");
  const help = document.getElementById("review-keys");
  if (!form || !help) return;
  const sections = [...form.querySelectorAll("section.curate")];
  if (!sections.length) return;
  const button = (action) => form.querySelector(`.review-actions button[value="${action}"]`);
  const boxes = (section) => [...section.querySelectorAll("fieldset.checks input[type=checkbox]")];
  let current = Math.max(0, sections.findIndex((section) => `#${section.id}` === window.location.hash));
  let submitted = false;

  const submit = (action) => {
    const target = action && form.querySelector(`button[name="action"][value="${action}"]`);
    if (!target || submitted) return false;
    form.requestSubmit(target); // a form the browser refuses (a field over its limit) stays, keys still work
    return true;
  };
  // One submit per page: a second key before the next page arrives must not record a second event.
  form.addEventListener("submit", () => {
    submitted = true;
  });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) submitted = false; // back to this page from the browser's cache
  });

  const focusSection = (index, scroll = true) => {
    current = (index + sections.length) % sections.length;
    sections.forEach((section, i) => section.classList.toggle("current-section", i === current));
    const section = sections[current];
    const first = boxes(section)[0] || section;
    first.focus({ preventScroll: !scroll });
    if (scroll) section.scrollIntoView({ block: "nearest" });
  };

  // The Nth label: 1-9, 0 for the 10th, Shift+1..9 for the 11th to 19th (by key position, so any layout works).
  const labelIndex = (event) => {
    const match = /^Digit(\d)$/.exec(event.code) || /^Numpad(\d)$/.exec(event.code);
    if (!match) return null;
    const digit = Number(match[1]);
    if (event.shiftKey) return digit === 0 ? null : 10 + digit;
    return digit === 0 ? 10 : digit;
  };

  // The map shown by "?": one row per key, built from the actions themselves so the help cannot drift.
  const accept = () => submit(button("accept-next") ? "accept-next" : "accept");
  const save = () => submit(button("next") ? "next" : "save");
  const undo = () => {
    const own = sections[current].querySelector('button[value^="undo:"]');
    return submit((own || form.querySelector('button[value^="undo:"]') || {}).value);
  };
  const focusField = (selector) => {
    const field = sections[current].querySelector(selector);
    if (!field) return false;
    field.focus();
    return true;
  };
  const keys = [
    [["a"], "Accept the labels as ticked" + (button("accept-next") ? " and open the next item" : ""), accept],
    [["Enter", "s"], "Save the changes" + (button("next") ? " and open the next item" : ""), save],
    [["Shift+S"], "Save the changes and stay on this item", () => submit("save")],
    [["k"], "Skip: decide later (the item goes to the back of your queue)", () => button("skip") && submit("skip")],
    [["u"], "Undo your last change in this taxonomy", undo],
    [["1", "…", "9", "0"], "Tick or untick the 1st to 10th label of this taxonomy", null],
    [["Shift+1", "…", "Shift+9"], "Tick or untick the 11th to 19th label", null],
    [["/"], "Search this taxonomy's labels to add one", () => focusField("[data-add]")],
    [["n"], "Write a note for this taxonomy", () => focusField("textarea")],
    [["]", "["], "Next / previous taxonomy", null],
    [["?"], "Show or hide this help", null],
    [["Esc"], "Leave a text field (then the keys work again) or close this help", null],
  ];
  const list = help.querySelector("[data-keys]");
  for (const [names, text] of keys) {
    const term = document.createElement("dt");
    for (const name of names) {
      const kbd = document.createElement(name === "…" ? "span" : "kbd");
      kbd.textContent = name;
      term.append(kbd, " ");
    }
    const description = document.createElement("dd");
    description.textContent = text;
    list.append(term, description);
  }
  // "Shift+S" is the key "S" (with Shift held); the other names are the keys themselves.
  const actions = new Map(
    keys.filter(([, , run]) => run).flatMap(([names, , run]) => names.map((name) => [name.replace(/^Shift\+/, ""), run])),
  );

  // Each label's number, shown beside its box.
  for (const section of sections) {
    boxes(section).forEach((box, i) => {
      if (i >= 19) return;
      const hint = document.createElement("kbd");
      hint.className = "key-hint";
      hint.setAttribute("aria-hidden", "true");
      hint.textContent = i < 9 ? String(i + 1) : i === 9 ? "0" : `⇧${i - 9}`;
      box.after(hint);
    });
    section.addEventListener("focusin", () => {
      current = sections.indexOf(section);
      sections.forEach((other) => other.classList.toggle("current-section", other === section));
    });
  }

  // Screen readers announce the keys with the buttons they press.
  const shortcuts = { accept: "A", "accept-next": "A", save: "Shift+S", next: "Enter S", skip: "K" };
  if (!button("next")) shortcuts.save = "Enter S Shift+S";
  for (const [action, names] of Object.entries(shortcuts)) {
    const target = button(action);
    if (target) target.setAttribute("aria-keyshortcuts", names);
  }
  if (button("accept-next")) button("accept").removeAttribute("aria-keyshortcuts");

  const opener = document.getElementById("review-keys-open");
  opener.hidden = false;
  opener.addEventListener("click", () => help.showModal());
  help.querySelector("[data-close]").addEventListener("click", () => help.close());

  const typing = (element) =>
    element instanceof HTMLTextAreaElement ||
    element instanceof HTMLSelectElement ||
    (element instanceof HTMLInputElement && !["checkbox", "radio", "submit", "button", "reset"].includes(element.type)) ||
    (element instanceof HTMLElement && element.isContentEditable);

  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.isComposing || event.ctrlKey || event.metaKey || event.altKey) return;
    const active = document.activeElement;
    if (event.repeat && !typing(active)) return; // a held key acts once (and keeps its browser meaning)
    if (help.open) {
      if (event.key === "?") {
        event.preventDefault();
        help.close();
      }
      return; // the dialog handles Escape itself
    }
    if (typing(active)) {
      if (event.key === "Escape") {
        active.blur();
        focusSection(current, false);
      }
      return;
    }
    // Enter and Space on a button or link keep their own meaning (press it).
    if ((event.key === "Enter" || event.key === " ") && active && active.closest("button, a, summary")) return;
    let handled = true;
    const index = labelIndex(event);
    if (index !== null) {
      const box = boxes(sections[current])[index - 1];
      if (box) {
        box.click(); // as a click does: change and input events for other scripts
        box.focus();
      }
    } else if (event.key === "?") {
      help.showModal();
    } else if (event.key === "]" || event.key === "[") {
      focusSection(current + (event.key === "]" ? 1 : -1));
    } else if (actions.has(event.key)) {
      actions.get(event.key)();
    } else {
      handled = false;
    }
    if (handled) event.preventDefault();
  });

  // A failed save leaves the error in view; otherwise the current taxonomy's first label is ready for keys.
  const error = document.getElementById("review-error");
  if (error) error.scrollIntoView({ block: "nearest" });
  focusSection(current, !error && current > 0);
  // Going to the "#tax-..." anchor moves the focus to the page once loading ends; take it back unless the
  // curator has put it somewhere since.
  window.addEventListener("load", () =>
    setTimeout(() => {
      if (document.activeElement === document.body || document.activeElement === null) focusSection(current, false);
    }),
  );
});
