"""The history of predictions: its page with filters (``views``), full-text search by the database's own engine
(``search``), lists that stay fast at a million rows (``paging``: capped counts, planned reads) and the downloads of
predictions and annotations (``exports``)."""
