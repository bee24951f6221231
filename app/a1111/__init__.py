"""AUTOMATIC1111's web API (/sdapi/v1), as a thin translation onto latentd's one request type.

A /sdapi request becomes the same JobRequest that POST /v1/jobs takes and goes through the same
admission, queue, workers, rate limits and metrics (app/routes/sdapi.py); nothing here runs a model.

    names.py      A1111's sampler and scheduler names <-> latentd's samplers
    schemas.py    the request and response bodies (A1111's field names)
    translate.py  a txt2img/img2img body -> a latentd JobRequest, refusing what latentd does not do
    masks.py      img2img inputs: base64 decoding, mask threshold/invert/blur, "fill"
    infotext.py   A1111's `info` JSON and infotext lines; reading PNG parameters (png-info)
    prefs.py      the options a key can read and set (its default model, kept in Redis)
"""
