"""`drgn explore`: a local web app over one training run's latent space (issue 14).

Layout: `runlink` is the only module that imports the run-directory helpers (latents, held-out rows,
decoding, devices), so they can be repointed in one place; `data` gathers every per-particle column;
`selection` turns the page's shapes and thresholds into a row mask over all particles; `volumes` decodes,
caches, meshes and saves maps; `server` is the HTTP layer (token, path confinement, JSON errors); the page
itself is static/ (own HTML/JS, no third-party scripts, nothing fetched at run time).
"""
