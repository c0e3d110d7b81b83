// Live progress for pages that show a background job (a CSV batch, a training run).
// The element with data-poll-url is refreshed from that JSON every few seconds: every [data-field="a.b"] inside it
// gets the value at that path as text (formatted by data-format), every [data-field-value] its value property.
// Every [data-show-if="path"] is hidden while that value is unknown (null). When the status changes (or the value
// at data-poll-watch, e.g. a training run's phase) the page reloads, so what the server renders for the new state
// (results, metrics, buttons, phases) appears. Without JavaScript the page has a Refresh link instead.
"use strict";

const POLL_MS = 2000;

function valueAt(data, path) {
  return path.split(".").reduce((node, key) => (node == null ? undefined : node[key]), data);
}

function format(value, how) {
  if (value == null || value === "") return "—";
  if (how === "duration") {
    const seconds = Math.max(0, Math.round(Number(value)));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
  }
  if (how && how.startsWith("fixed:")) return Number(value).toFixed(Number(how.slice(6)));
  return typeof value === "number" ? value.toLocaleString("en") : String(value);
}

function watch(box) {
  const initial = box.dataset.pollStatus;
  if (initial !== "queued" && initial !== "running") return;
  const watched = box.dataset.pollWatch;
  const tick = async () => {
    try {
      const response = await fetch(box.dataset.pollUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) {
        const data = await response.json();
        const moved = watched && String(valueAt(data, watched) ?? "") !== box.dataset.pollWatchValue;
        if (data.status !== initial || moved) {
          window.location.reload();
          return;
        }
        for (const el of box.querySelectorAll("[data-show-if]")) el.hidden = valueAt(data, el.dataset.showIf) == null;
        for (const el of box.querySelectorAll("[data-field]")) el.textContent = format(valueAt(data, el.dataset.field), el.dataset.format);
        for (const el of box.querySelectorAll("[data-field-value]")) {
          const value = valueAt(data, el.dataset.fieldValue);
          if (value != null) el.value = value;
        }
        for (const el of box.querySelectorAll("[data-field-max]")) {
          const value = valueAt(data, el.dataset.fieldMax);
          if (value) el.max = value;
        }
      }
    } catch (error) {
      // The server may be restarting; keep trying.
    }
    window.setTimeout(tick, POLL_MS);
  };
  window.setTimeout(tick, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const box of document.querySelectorAll("[data-poll-url]")) watch(box);
});
