from calhook.cli import main

main()
