"""One plain function per stage; `pipeline.run` lists them once, in order (`front_end`, then `compile_model`)."""
