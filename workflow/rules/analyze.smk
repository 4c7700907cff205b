# Stage 5: latent-space analysis of the high-res run: PCA, UMAP, k-means on-data centres decoded to
# volumes, and volumes along the first principal components.


rule analyze_highres:
    input:
        **get_run_outputs(HIGHRES),
    output:
        outdir=report(
            directory(f"{R}/highres/analyze"),
            patterns=["{name}.png"],
            caption="../report/analyze.rst",
            category=get_report_category("4. Latent space"),
            labels=get_report_label("{name}"),
        ),
    log:
        get_log("analyze", "analyze"),
    benchmark:
        get_benchmark("analyze", "analyze")
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("analyze")
    resources:
        **get_resources("analyze"),
    params:
        run_dir=folder_of_input("model"),
        analysis=config["analyze"],
        device=config["device"],
        version=DRGN_VERSION,
    shell:
        "drgn analyze {params.run_dir} -o {output.outdir} --ksample {params.analysis[ksample]} "
        "--pc {params.analysis[pc]} --seed {params.analysis[seed]} --device {params.device} "
        "{params.analysis[extra]} > {log} 2>&1"
