// Bulk actions (templates/bulk/_panel.html): "tick all on this page" ticks every row's box. Without JavaScript
// the scope radios ("all on this page", "all matching this filter") do the same on the server.
(function () {
  var all = document.getElementById("bulk-all-page");
  if (!all) return;
  all.closest(".bulk-js").hidden = false;
  all.addEventListener("change", function () {
    document.querySelectorAll(".bulk-box").forEach(function (box) { box.checked = all.checked; });
  });
})();
