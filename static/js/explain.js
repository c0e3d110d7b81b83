// "Why these labels?" on a prediction's page: the Explain button fetches /api/v1/predictions/<id>/explanation for
// its taxonomy once, then colours each sentence by how much the chosen label's score drops without it (changing
// the label re-colours at once). Without JavaScript the form reloads the page with the explanation rendered there.
"use strict";

// The same buckets as webapp/evidence/explain.py heat_class().
const LEVELS = 4;
const NEGLIGIBLE_DROP = 0.005;
const MIN_SCALE = 0.05;

function heatClass(drop, scale) {
  if (Math.abs(drop) < NEGLIGIBLE_DROP) return "heat-0";
  const level = Math.min(LEVELS, Math.ceil((LEVELS * Math.abs(drop)) / Math.max(scale, MIN_SCALE)));
  return `heat-${drop > 0 ? "pos" : "neg"}-${level}`;
}

function percent(value) {
  return `${(value * 100).toFixed(1)}%`;
}

function show(panel, explanation, label) {
  const status = panel.querySelector("[data-explain-status]");
  const entry = explanation.labels.find((item) => item.label === label);
  status.className = "muted small";
  if (!entry) {
    status.textContent = `${label} is not a label of the model serving now (${explanation.model_version}).`;
    return;
  }
  const scale = Math.max(...entry.sentences.map((s) => Math.abs(s.drop)));
  const spans = panel.querySelectorAll("[data-sentence]");
  const drops = panel.querySelectorAll("[data-drop]");
  entry.sentences.forEach((sentence, i) => {
    const css = sentence.read ? heatClass(sentence.drop, scale) : "unread";
    spans[i].className = `sent sent-${sentence.field} ${css}`;
    const sign = sentence.drop > 0 ? "+" : "";
    drops[i].textContent = css.startsWith("heat-pos") || css.startsWith("heat-neg") ? `${sign}${(sentence.drop * 100).toFixed(1)}` : "";
  });
  const note = explanation.note ? `${explanation.note}; ` : "";
  status.textContent = `${note}${label}: ${percent(entry.score)} (threshold ${percent(entry.threshold)})`;
  panel.querySelector("[data-explained]").hidden = false;
}

function setup(panel) {
  const form = panel.querySelector("form");
  if (!form) return;
  const select = form.querySelector("select");
  const button = form.querySelector("button");
  const status = panel.querySelector("[data-explain-status]");
  let explanation = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!explanation) {
      button.disabled = true;
      status.className = "muted small";
      status.textContent = "Explaining…";
      try {
        const response = await fetch(panel.dataset.explainUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" });
        const body = await response.json();
        if (!response.ok) {
          status.className = "error";
          status.textContent = body.error || `the server answered ${response.status}`;
          return;
        }
        explanation = body.explanations[panel.dataset.explainSlug];
      } catch (error) {
        status.className = "error";
        status.textContent = "The explanation could not be fetched; try again.";
        return;
      } finally {
        button.disabled = false;
      }
    }
    show(panel, explanation, select.value);
  });
  select.addEventListener("change", () => {
    if (explanation) show(panel, explanation, select.value);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const panel of document.querySelectorAll("[data-explain-url]")) setup(panel);
});
