"""Development helpers shared by tests/ and bench/: real redis-server, API and worker processes
(services, api_proc), random Stable Diffusion folders built offline (tiny_model), and the full-size
SD 1.5 component configs (sd15).

Not part of the installed package: it lives in the repository beside tests/ and bench/. pytest finds
it through the repository root it puts on sys.path for the tests package; a bench script puts the
repository root on sys.path itself before importing it.
"""
