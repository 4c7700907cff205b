# Stage 7: validation independent of the neural model: a classical back-projection of the kept particles
# (half maps and their FSC), and, for simulated data, metrics against ground truth for the high-res run
# (latent, filter, per-image FSC) and for each pilot (latent only).


rule backproject_kept:
    input:
        table=TABLE,
        stack=get_stack(HIGH_D),
        kept=f"{FILTER}/kept.npy",
    output:
        map=f"{R}/validation/backproject/map.mrc",
        half1=f"{R}/validation/backproject/half1.mrc",
        half2=f"{R}/validation/backproject/half2.mrc",
        fsc=f"{R}/validation/backproject/fsc.json",
        plot=report(
            f"{R}/validation/backproject/fsc.png",
            caption="../report/backproject.rst",
            category="5. Validation",
            labels={"figure": "half-map FSC of the kept particles"},
        ),
    log:
        get_log("validate", "backproject"),
    benchmark:
        get_benchmark("validate", "backproject")
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("backproject")
    resources:
        **get_resources("backproject"),
    params:
        outdir=folder_of_output("map"),
        half_map_seed=config["validate"]["seed"],
        device=config["device"],
        version=DRGN_VERSION,
    shell:
        "drgn backproject {input.table} {input.stack} -o {params.outdir} --ind {input.kept} "
        "--seed {params.half_map_seed} --device {params.device} > {log} 2>&1"


if GROUND_TRUTH:

    rule evaluate_highres:
        input:
            **get_run_outputs(HIGHRES),
            table=TABLE,
            gt_volumes=f"{SIM_DIR}/gt_volumes",
            kept=f"{FILTER}/kept.npy",
        output:
            metrics=f"{R}/validation/metrics.json",
        log:
            get_log("validate", "evaluate"),
        benchmark:
            get_benchmark("validate", "evaluate")
        conda:
            "../../envs/cpu.yaml"
        threads: get_threads("evaluate")
        resources:
            **get_resources("evaluate"),
        params:
            run_dir=folder_of_input("model"),
            filter_dir=folder_of_input("kept"),
            n_fsc_images=config["validate"]["n_fsc"],
            device=config["device"],
            version=DRGN_VERSION,
        shell:
            "drgn evaluate {params.run_dir} --table {input.table} --gt-dir {input.gt_volumes} "
            "--filter-dir {params.filter_dir} --n-fsc {params.n_fsc_images} --device {params.device} "
            "-o {output.metrics} > {log} 2>&1"

    rule evaluate_pilot:
        input:
            model=f"{get_pilot_dir('{zdim}')}/model.pt",
            z=f"{get_pilot_dir('{zdim}')}/z.npy",
            table=TABLE,
        output:
            metrics=f"{R}/validation/metrics_pilot_z{{zdim}}.json",
        log:
            get_log("validate", "evaluate_pilot_z{zdim}"),
        benchmark:
            get_benchmark("validate", "evaluate_pilot_z{zdim}")
        conda:
            "../../envs/cpu.yaml"
        threads: get_threads("evaluate")
        resources:
            **get_resources("evaluate"),
        params:
            run_dir=folder_of_input("model"),
            version=DRGN_VERSION,
        shell:
            # latent metrics only (|Spearman rho|, ARI): no per-image FSC for the small pilot models
            "drgn evaluate {params.run_dir} --table {input.table} --n-fsc 0 -o {output.metrics} > {log} 2>&1"
