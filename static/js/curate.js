// Correction form enhancement: picking a label from the search box adds it as a removable chip, so several
// labels can be added in one save. Without this script the search box still adds one label per save.
"use strict";

// Whether a mouse button or a finger is down: a chip made then (the box loses focus on the press) moves the page under
// the pointer, and the press's target (Save, say) is no longer there when it ends, so the click is lost.
let pressing = false;
document.addEventListener("pointerdown", () => { pressing = true; }, true);
document.addEventListener("pointerup", () => { pressing = false; }, true);
document.addEventListener("pointercancel", () => { pressing = false; }, true);

document.addEventListener("DOMContentLoaded", () => {
  for (const picker of document.querySelectorAll("[data-picker]")) {
    const input = picker.querySelector("[data-add]");
    const picked = picker.querySelector("[data-picked]");
    const list = input && input.list;
    if (!input || !picked || !list) continue;
    const known = new Map([...list.options].map((option) => [option.value.toLowerCase(), option.value]));

    const add = (label) => {
      if ([...picked.querySelectorAll("input")].some((hidden) => hidden.value === label)) return;
      const chip = document.createElement("li");
      chip.className = "chip";
      chip.textContent = label + " ";
      const hidden = document.createElement("input");
      hidden.type = "hidden";
      hidden.name = input.name; // "<taxonomy>-add" on the one review form
      hidden.value = label;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "chip-remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${label}`);
      remove.addEventListener("click", () => {
        chip.remove();
        input.focus();
      });
      chip.append(hidden, remove);
      picked.append(chip);
    };

    const takeInput = () => {
      const label = known.get(input.value.trim().toLowerCase());
      input.setCustomValidity("");
      if (!label) return false;
      add(label);
      input.value = "";
      return true;
    };

    // Choosing from the list is an "input" event that is not typing (Chromium: insertReplacementText);
    // other browsers at least fire "change" when the box loses focus.
    input.addEventListener("input", (event) => {
      if (!(event instanceof InputEvent) || event.inputType === "insertReplacementText") takeInput();
    });
    input.addEventListener("change", () => {
      if (!pressing) takeInput();
      else document.addEventListener("click", takeInput, { once: true }); // after the press's own click
    });
    // A label still in the box when the form is sent goes as its chip would (the list's spelling).
    if (input.form) input.form.addEventListener("submit", takeInput);
    input.addEventListener("keydown", (event) => {
      if (event.key !== "Enter" || !input.value.trim()) return;
      event.preventDefault();
      if (!takeInput()) {
        input.setCustomValidity("Not a label of this taxonomy: pick one from the list, or propose it as a new label.");
        input.reportValidity();
      }
    });
  }
});
