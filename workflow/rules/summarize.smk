# Stage 9: the report's summary table: particles in / kept / removed, epochs, run times from the
# benchmark files, resolutions and ground-truth metrics, as JSON and as an HTML table for the report.


localrules:
    summarize,


rule summarize:
    input:
        unpack(get_summary_inputs),
    output:
        json=f"{R}/report/summary.json",
        html=report(
            f"{R}/report/summary.html",
            caption="../report/summary.rst",
            category="0. Summary",
            labels={"table": "summary"},
        ),
    log:
        get_log("summarize", "summarize"),
    benchmark:
        # top level of the benchmark folder: the summary reads <stage>/*.tsv there and cannot time itself
        f"{BENCHMARKS}/summarize.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("summarize")
    resources:
        **get_resources("summarize"),
    params:
        pilot_dirs=lambda wildcards, input: [str(Path(m).parent) for m in input.pilots],
        highres_dir=lambda wildcards, input: str(Path(input.highres).parent),
        filter_dir=lambda wildcards, input: str(Path(input.kept).parent),
        metrics_flags=lambda wildcards, input: " ".join(
            f"--metrics {m}" for m in input.metrics
        ),
        backproject_flag=lambda wildcards, input: (
            f"--backproject {Path(input.backproject[0]).parent}"
            if input.backproject
            else ""
        ),
        landscape_flag=lambda wildcards, input: (
            f"--landscape {dict(input.items())['landscape']}"
            if "landscape" in dict(input.items())
            else ""
        ),
        benchmark_dir=BENCHMARKS,
        version=DRGN_VERSION,
    shell:
        "drgn summarize --table {input.table} --filter-dir {params.filter_dir} "
        "--pilot {params.pilot_dirs} --highres {params.highres_dir} {params.backproject_flag} "
        "{params.metrics_flags} {params.landscape_flag} --benchmarks {params.benchmark_dir} -o {output.json} --html {output.html} > {log} 2>&1"
