"""Curation: what people say about predictions, kept as append-only annotation events.

``annotations`` reads events (current labels, review states, what is still in force after undos), ``corrections``
is the one command that validates and writes them (``ReviewCommand``: correct, accept, skip, undo, adjudicate),
``curate`` the review queue and page, ``bulk`` one action over many predictions, ``agreement`` several curators and
adjudication, ``label_issues`` the queue of likely label errors the trainer finds with cleanlab.
"""
