"""The serving core: the model bundle contract (``bundle``), onnxruntime inference with one shared encoder pass for
every taxonomy (``inference``), the registry and each worker's hot-swapped live models (``registry``), and the
checking, scoring and storing of submissions (``scoring``)."""
