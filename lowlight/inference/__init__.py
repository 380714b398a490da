"""Building blocks of the end-to-end inference pipeline (`lowlight.pipeline`).

  runs.py         a trained run directory → validated weights + a jitted, fixed-batch forward
  calibration.py  the verification threshold of a recognition run
  draw.py         boxes and labels drawn onto the input photo
  errors.py       the exceptions the command line turns into one-line messages (exit code 2)
"""
