"""A run of a recipe, end to end: planning and executing it (``orchestrate``), its lock file
(``lockfile``), watching upstream for new releases (``watch``) and the reports a run leaves
behind for CI (``report``)."""
