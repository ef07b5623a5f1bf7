"""tfseg: semantic image segmentation, 2D and 3D, with TensorFlow 2 and Keras 3.

Stages talk only through files, like TFX components:

    convert  -> sharded TFRecords + dataset.json      (tfseg.convert)
    fit      -> RUN_DIR with checkpoints and history  (tfseg.fit)
    evaluate -> metrics.json, report.md, pictures     (tfseg.evaluate)
    export   -> TF Serving SavedModel NAME/VERSION/   (tfseg.export)
    predict  -> masks                                 (tfseg.predict)

Importing the package is cheap: TensorFlow and Beam are imported by the stage modules only.
"""

__version__ = "0.1.0"
