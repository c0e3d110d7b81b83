"""Background work: the job engine (``engine``: Huey queues a job's id, a worker claims its row, progress and
heartbeats stay in the job's table), the worker process that runs it (``worker``: ``flask --app wsgi jobs worker``)
and the work itself, each with its pages: CSV batches (``batch``) and replays before promotion (``replay``)."""
