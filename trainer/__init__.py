"""papertag trainer: fine-tunes an encoder on labelled abstracts and writes a model bundle."""
