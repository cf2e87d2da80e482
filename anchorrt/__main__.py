from anchorrt.cli import main

main()
