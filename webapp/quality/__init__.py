"""Model quality after release: live per-label quality from curators' reviews (``live``), thresholds re-tuned from
those reviews and offered as a new version (``learned_thresholds``), and the threshold tuning both they and the
trainer use (``tuning``), so a threshold means the same thing on the site and in a training run."""
