#compdef stade

_stade_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _STADE_COMPLETE=complete_zsh stade)
}

compdef _stade_completion stade
