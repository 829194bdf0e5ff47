"""Experiment suites: many training runs of one config, compared in a report.

Each suite module (transfer, capacity, noise, affinity) has the same three parts:
`plan(base, seeds, ...) -> list[RunSpec]` (which runs, as config overrides),
`analyze(specs, results, ...) -> dict` (every number of the report) and
`write_report(out_dir, analysis, meta, results)` (report.md and PNG plots); a suite that needs
inputs of its own adds `prepare(base, specs, suite_dir)` (`suite.SuiteModule`).
`suite.run_experiment` ties them to `runner.run_specs`, which trains every run with the ordinary
training driver (`pipeline.train.driver.train`): there is no second training loop here.
"""
