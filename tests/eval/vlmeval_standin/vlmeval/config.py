"""``supported_VLM``: model name -> constructor (VLMEvalKit fills it with partials of its model
classes; run.py and vlmeval.inference look names up here)."""
supported_VLM = {}
