"""Runtime of the Contact360 background worker: settings, arq worker classes, client, CLI."""
