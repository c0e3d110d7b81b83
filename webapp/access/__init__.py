"""Who may do what: people, sign-in and their sessions (``accounts``), roles and API tokens (``auth``), and the one
rule table that says who may read each page and API route (``read_access``)."""
