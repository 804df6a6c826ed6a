"""One plain function per stage; `pipeline.run.compile_model` calls them in order."""
