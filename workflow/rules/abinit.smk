# Stage 1b (input.poses abinit): the imported table has no poses; drgn abinit finds them on the pilot
# stack. Its run directory's poses.star (= TABLE) is the particle table of every later stage: pilots,
# filter, high-res, analysis, validation and export (which writes the found poses: drgn export reads the
# table's own poses for a drgn abinit run).

if ABINIT:

    rule abinit:
        input:
            table=IMPORTED,
            stack=get_stack(PILOT_D),
        output:
            poses=TABLE,
            model=f"{ABINIT_DIR}/model.pt",
            confidence=f"{ABINIT_DIR}/confidence.npy",
            summary=f"{ABINIT_DIR}/abinit.json",
            confidence_plot=report(
                f"{ABINIT_DIR}/confidence.png",
                caption="../report/abinit_confidence.rst",
                category="0. Ab initio poses",
                labels={"figure": "pose confidence"},
            ),
        log:
            get_log("abinit", "abinit"),
        benchmark:
            get_benchmark("abinit", "abinit")
        conda:
            "../../envs/gpu.yaml"
        threads: get_threads("abinit")
        resources:
            **get_resources("abinit"),
        params:
            run_dir=folder_of_output("poses"),
            abinit=config["abinit"],
            device=config["device"],
            version=DRGN_VERSION,
        shell:
            "drgn abinit {input.table} {input.stack} -o {params.run_dir} --auto-resume "
            "--zdim {params.abinit[zdim]} --seed {params.abinit[seed]} --device {params.device} "
            "--threads {threads} {params.abinit[extra]} > {log} 2>&1"
