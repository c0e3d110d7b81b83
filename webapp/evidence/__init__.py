"""What a stored prediction's tags rest on: the sentences that drove each label, by occlusion (``explain``), and the
past abstracts nearest it (``similar``), found through a vector index with bounded memory (``similar_index``)."""
