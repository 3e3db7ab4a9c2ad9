"""The course's helpers, kept apart from the layers: Fashion-MNIST loading (`data`), the training loop (`learner`), the
lesson-10 layer (`lesson10`), the small-batch study (`experiments`), the benchmark (`bench`) and the `rbn` command
(`cli`). The library a model imports is `rbn` itself."""
