"""The job contract between latentd's API and its workers, torch-free and owned by neither: the
job spec, Redis keys and Lua, the job store and client, events, result stores, image encoding
and webhook records. `app/` and `worker/` both import it; it imports neither."""
