from dpe.cli import main

main()
