"""Fetching EMPIAR entries and published input files, resumably and verifiably.

EMPIAR publishes no file list, no sizes through its API and no checksums, throttles each HTTPS connection
to about 1.5 MB/s, and its directory listings occasionally omit a file. The modules here work around each
of those facts:

- `api`: the entry's metadata from the REST API, parsed defensively (numbers arrive as strings);
- `listing`: walking the Apache-style HTTPS directory listing, with the include globs;
- `download`: parallel Range requests over a bounded pool of connections, resumable after any
  interruption (a progress index beside each partial file records what is on disk);
- `verify`: what "complete" means (server size, MRC header size) and the sha256 manifest.
"""
