// The history label filter's suggestions follow the taxonomy select: when it changes, the datalist is refilled
// with that taxonomy's labels from /api/v1/label-suggestions (without JavaScript the page renders the chosen
// taxonomy's labels, or every taxonomy's, itself).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("label-taxonomy");
  const list = document.getElementById("known-labels");
  if (!select || !list) return;
  select.addEventListener("change", async () => {
    const url = new URL(select.dataset.suggestUrl, window.location.href);
    if (select.value) url.searchParams.set("taxonomy", select.value);
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) return; // keep the suggestions shown: the filter still works without them
    const body = await response.json();
    const options = body.taxonomies.flatMap((t) =>
      t.labels.map((label) => {
        const option = document.createElement("option");
        option.value = label;
        option.textContent = t.name;
        return option;
      }),
    );
    list.replaceChildren(...options);
    list.dataset.taxonomy = select.value;
  });
});
