from vdpa_svq.cli import main

main()
