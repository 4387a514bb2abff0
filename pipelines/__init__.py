"""End-to-end flows (import, verify, build, distill, eval, demo). Each owns its run: seeding, run directory,
resolved config, progress reporting. Installed as ``mcad_cache.pipelines``."""
