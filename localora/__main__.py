from localora.cli import main

main()
