from editr1.cli import main

main()
