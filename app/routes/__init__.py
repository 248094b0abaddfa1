"""One router per resource; each route parses, calls a core.db query, commits, shapes the response."""
