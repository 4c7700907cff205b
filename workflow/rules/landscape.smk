# Stage 5b: landscape analysis of the high-res run (cryoDRGN's analyze_landscape): maps decoded at on-data
# k-means centres, masked, volume PCA, maps clustered into states, per-state particles and maps.


rule landscape_highres:
    input:
        **get_run_outputs(HIGHRES),
        analysis=f"{R}/highres/analyze",
    output:
        outdir=report(
            directory(f"{R}/highres/landscape"),
            patterns=["{name}.png"],
            caption="../report/landscape.rst",
            category=get_report_category("5. Landscape"),
            labels=get_report_label("landscape ({name})"),
        ),
    log:
        get_log("landscape", "landscape"),
    benchmark:
        get_benchmark("landscape", "landscape")
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("landscape")
    resources:
        **get_resources("landscape"),
    params:
        run_dir=folder_of_input("model"),
        flags=get_landscape_flags(),
        device=config["device"],
        version=DRGN_VERSION,
    shell:
        "drgn landscape {params.run_dir} -o {output.outdir} --analysis {input.analysis} {params.flags} "
        "--device {params.device} > {log} 2>&1"
