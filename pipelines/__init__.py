"""One runnable pipeline per seed experiment: ``tfseg run NAME --input RAW_DIR --workdir DIR``.

Each ``NAME.yaml`` names the dataset layout and the options of every stage (convert, fit,
evaluate, export). Installed as ``tfseg.pipelines`` so ``tfseg run carvana`` works from any
directory; a path to your own YAML file works too.
"""
