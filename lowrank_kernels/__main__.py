from lowrank_kernels.demo import main

if __name__ == "__main__":
    main()
