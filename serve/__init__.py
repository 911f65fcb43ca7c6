"""Ray Serve application for online scoring (``serve.app:build_app``); the scoring itself is
:mod:`datasel_ray.scoring`."""
